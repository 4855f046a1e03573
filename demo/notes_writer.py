"""A writer of acknowledged rows: POSTs notes to the sample app at a fixed rate from one thread, and
remembers each row the app acknowledged (201) with the times just before its request and just after its
answer. What a copy must hold is then known by time: every row acknowledged before a moment."""

import threading
import time

import requests


class NotesWriter:
    def __init__(self, url, rate=150, prefix="w", fields=None):
        """fields: a form to post with the row's name as its "body" (e.g. a post's author_id); else the
        name is the request's whole body (a note)."""
        self.url, self.rate, self.prefix, self.fields = url, rate, prefix, fields
        self.acked = []             # (body, sent, acknowledged), in order
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.started = 0.0

    def run(self):
        session, n = requests.Session(), 0
        while not self.stop_flag.is_set():
            wait = self.started + n / self.rate - time.time()
            if wait > 0:
                time.sleep(wait)
            sent = time.time()
            try:
                name = f"{self.prefix}{n}"
                data = {**self.fields, "body": name} if self.fields else name
                answer = session.post(self.url, data=data, timeout=2)
                if answer.status_code == 201:
                    self.acked.append((name, sent, time.time()))
            except requests.RequestException:
                pass
            n += 1

    def __enter__(self):
        self.started = time.time()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.stop_flag.set()
        self.thread.join(timeout=10)

    def rate_achieved(self):
        if len(self.acked) < 2:
            return 0.0
        return len(self.acked) / (self.acked[-1][2] - self.acked[0][1])

    def lost(self, kept, before):
        """[(body, seconds before `before` it was acknowledged)] of the rows acknowledged by `before` that
        are not in kept (a set of bodies)."""
        return [(body, before - acked) for body, _, acked in self.acked if acked <= before and body not in kept]

"""Primitives shared by deploy.py, verify.py, status.py, rollback.py and backup.py.

One module per concern: config, gitrepo (git), backups (SQLite backups),
units (systemd --user), health (HTTP), state (locks and the deploy log),
files (atomic writes), commands (pre_restart), cli (what every script shares).
The package returns values or raises DeployError; scripts decide what to print.
"""

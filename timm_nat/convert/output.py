"""Output folders: the converter only ever deletes what it wrote itself.

Every folder it writes holds a manifest, ``timm-nat-convert.json``, listing its files. ``--force``
replaces an existing output only if that manifest is there and nothing else was added; an output
never overlaps its source. A new output is written into ``.NAME.partial-PID`` beside the target
and swapped in by renames (old aside, new in, then old deleted): a failure at any point leaves the
old output in place. Partial and set-aside folders of dead converter processes are cleaned up
(an old output set aside by a run killed mid-swap is put back).
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

from .errors import ConversionError, log

__all__ = ['MANIFEST_NAME', 'PROG', 'check_no_overlap', 'check_output', 'clean_stale', 'read_manifest',
           'rerun_command', 'staged_output', 'write_manifest']

PROG = 'timm-nat-convert'
MANIFEST_NAME = 'timm-nat-convert.json'
_SIDE_FOLDER = re.compile(r'\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)')


def rerun_command() -> str:
    """How to run the converter again the way this process was started, for commands printed to run as
    printed: ``<python> tools/convert.py`` when the checkout's script was run (each path relative to the
    working folder when inside it, e.g. ``.venv/bin/python tools/convert.py`` after the README's
    set-up), else the installed entry point ``timm-nat-convert``."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.name != 'convert.py' or not script.is_file():
        return PROG
    return ' '.join(shlex.quote(_shown_path(path)) for path in (sys.executable, script))


def _shown_path(path) -> str:
    """``path`` relative to the working folder when inside it, else absolute (links are kept: a
    virtual environment's python is a link that must stay the environment's)."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    """The converter's manifest of ``folder``, or None if it has none (or one not written by it)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get('written_by') != PROG or not isinstance(manifest.get('files'), list):
        return None
    return manifest


def write_manifest(folder: Path, files: Sequence[str], **facts: Any) -> None:
    """Mark ``folder`` as the converter's, listing the ``files`` it wrote there."""
    manifest = dict(written_by=PROG, files=sorted(files), **facts)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + '\n')


def check_output(output_dir: Path, force: bool) -> None:
    """Refuse an existing output without ``force``, and any existing output the converter did not write."""
    output_dir = Path(output_dir)
    if not output_dir.exists() and not output_dir.is_symlink():
        return
    if output_dir.is_symlink():
        raise ConversionError(f"output {output_dir} is a symbolic link; give the folder it points to, or another output")
    if not force:
        raise ConversionError(f"output {output_dir} already exists; pass --force to overwrite it")
    if not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder; not deleting it")
    entries = sorted(p.name for p in output_dir.iterdir())
    if not entries:
        return
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise ConversionError(
            f"output {output_dir} exists and is not a converted model folder (no {MANIFEST_NAME}, which {PROG} "
            "writes into its outputs); not deleting it")
    foreign = [n for n in entries if n not in manifest['files'] and n != MANIFEST_NAME]
    if foreign:
        raise ConversionError(
            f"output {output_dir} holds files {PROG} did not write ({', '.join(foreign)}); not deleting them")


def check_no_overlap(source_root: Path, output_dir: Path) -> None:
    """Refuse an output that is the source, lies inside it, or holds it (replacing it would delete the source)."""
    output = Path(output_dir).expanduser().resolve()
    for source in {Path(source_root).absolute(), Path(source_root).resolve()}:
        if output == source:
            raise ConversionError(f"output {output_dir} is the source {source_root}; choose another output")
        if source in output.parents:
            raise ConversionError(f"output {output_dir} is inside the source {source_root}; choose an output outside it")
        if output in source.parents:
            raise ConversionError(
                f"output {output_dir} holds the source {source_root} (replacing it would delete the source); "
                "choose another output")


def _side_folder(output_dir: Path, kind: str, pid: int) -> Path:
    return output_dir.parent / f'.{output_dir.name}.{kind}-{pid}'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(output_dir: Path, log: Callable[[str], None] = log) -> None:
    """Remove the partial and set-aside folders of ``output_dir`` left by dead converter runs.

    Only folders holding the converter's manifest are touched. A set-aside old output whose run
    died before the new one was renamed in is put back in place instead.
    """
    if not output_dir.parent.is_dir():
        return
    for folder in sorted(output_dir.parent.iterdir()):
        m = _SIDE_FOLDER.fullmatch(folder.name)
        if not m or m['name'] != output_dir.name or not folder.is_dir() or _pid_alive(int(m['pid'])):
            continue
        if read_manifest(folder) is None:
            continue  # not ours: leave it alone
        if m['kind'] == 'old' and not output_dir.exists():
            folder.rename(output_dir)
            log(f"restored {output_dir} (set aside by a converter run that died, pid {m['pid']})")
        else:
            shutil.rmtree(folder)
            log(f"removed {folder} (left by a converter run that died, pid {m['pid']})")


def _chmod_like_new_files(folder: Path) -> None:
    """safetensors writes 0600; outputs are meant to be shared, so files get the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


@contextlib.contextmanager
def staged_output(output_dir: Path, force: bool, log: Callable[[str], None] = log, **facts: Any) -> Iterator[Path]:
    """A fresh partial folder beside ``output_dir``; on a clean exit it replaces ``output_dir``.

    The caller writes the files into the yielded folder; the manifest (files written, plus
    ``facts``) is added here. Just before the swap, :func:`check_output` runs again (a folder may
    have appeared, or been restored by :func:`clean_stale`, since the caller checked). The swap is
    old aside, new in, old deleted; if the new one cannot be renamed in, the old is put back. On any
    error the partial folder is removed and the old output stays as it was.
    """
    output_dir = Path(output_dir)
    clean_stale(output_dir, log)
    staging = _side_folder(output_dir, 'partial', os.getpid())
    if staging.exists() and read_manifest(staging) is not None:
        shutil.rmtree(staging)  # this process's own, from an interrupted earlier call
    staging.mkdir(parents=True)
    try:
        write_manifest(staging, [], state='partial')  # ours from the start, so a killed run is cleanable
        yield staging
        write_manifest(staging, [p.name for p in staging.iterdir() if p.name != MANIFEST_NAME], **facts)
        _chmod_like_new_files(staging)
        check_output(output_dir, force)  # again: whatever is there now is what the swap deletes
        _swap_in(staging, output_dir)
    finally:
        if staging.exists() and read_manifest(staging) is not None:
            shutil.rmtree(staging)


def _swap_in(staging: Path, output_dir: Path) -> None:
    old = None
    if output_dir.exists():
        old = _side_folder(output_dir, 'old', os.getpid())
        output_dir.rename(old)
    try:
        staging.rename(output_dir)
    except OSError as err:
        if old is not None:
            old.rename(output_dir)
        raise ConversionError(f"could not move the new output into {output_dir} ({err}); the old one is unchanged") from err
    if old is not None:
        shutil.rmtree(old)

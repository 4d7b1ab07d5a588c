"""How export names become paths under the mountpoint, reversibly.

The rules (also in the man page):

1. A ``/`` in an export name makes a subdirectory: export ``vm/disk1`` is ``vm/disk1``.
2. A ``%`` in a name is written ``%25``, so every other ``%`` below is unambiguous.
3. When splitting on ``/`` would give an empty, ``.`` or ``..`` component (``/abs``,
   ``a//b``, ``../x``), or would make one path both a file and a directory (exports ``a`` and
   ``a/b``), the name is not split: it is one file in the top directory, each ``/`` written
   ``%2F`` and a leading ``.`` written ``%2E``.
4. The default export (the empty name) is the file ``%default%``. An export whose first
   component would be ``.nbdfs-status`` (the daemon's status file in the top directory) is
   written whole, as in rule 3.
5. A component longer than 255 bytes (NAME_MAX) is cut to 200 bytes plus ``%~`` and 16 hex
   digits of its SHA-256. This one is not reversible from the name alone; ``nbdfs status``
   (and, mounted with ``--xattr``, the xattr ``user.nbd.export``) tells the true name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_EXPORT_FILE = "%default%"
# The daemon's status, as JSON, in a read-only file of the top directory that a lookup finds
# and a listing never shows (as s3ql's control file): what `nbdfs status` reads.
STATUS_FILE = ".nbdfs-status"
_NAME_MAX = 255


def _fit(component: str) -> str:
    raw = component.encode("utf-8", "surrogateescape")
    if len(raw) <= _NAME_MAX:
        return component
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return raw[:200].decode("utf-8", "ignore") + "%~" + digest


def _whole(name: str) -> tuple[str, ...]:
    text = name.replace("%", "%25").replace("/", "%2F")
    if text.startswith("."):
        text = "%2E" + text[1:]
    return (_fit(text),)


def export_paths(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Map each export name to its path components below the mountpoint."""
    paths: dict[str, tuple[str, ...]] = {}
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    # Shorter names first, so "a" stays a file and "a/b" is the one written whole.
    for name in sorted(set(names), key=lambda n: (n.count("/"), n)):
        if name == "":
            path: tuple[str, ...] = (DEFAULT_EXPORT_FILE,)
        else:
            parts = name.split("/")
            if any(p in ("", ".", "..") for p in parts) or parts[0] == STATUS_FILE:
                path = _whole(name)
            else:
                path = tuple(_fit(p.replace("%", "%25")) for p in parts)
                prefixes = {path[:i] for i in range(1, len(path))}
                if prefixes & files or path in dirs or path in files:
                    path = _whole(name)
        if path in files or path in dirs:  # only a hash collision of cut names gets here
            path = (*path[:-1], path[-1] + "%~" + hashlib.sha256(name.encode()).hexdigest()[:8])
        files.add(path)
        dirs.update(path[:i] for i in range(1, len(path)))
        paths[name] = path
    return paths


def export_name(path: tuple[str, ...]) -> str:
    """Invert :func:`export_paths` for names that were not cut (rule 5)."""
    if path == (DEFAULT_EXPORT_FILE,):
        return ""
    parts = []
    for component in path:
        text = component
        if text.startswith("%2E"):
            text = "." + text[3:]
        parts.append(text.replace("%2F", "/").replace("%25", "%"))
    return "/".join(parts)

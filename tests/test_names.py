"""Export names become paths under the mountpoint reversibly (nbdfs.names)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbdfs.names import DEFAULT_EXPORT_FILE, STATUS_FILE, export_name, export_paths

CASES = {
    "": (DEFAULT_EXPORT_FILE,),
    "disk": ("disk",),
    "vm/disk 1": ("vm", "disk 1"),
    "100%": ("100%25",),
    "/abs": ("%2Fabs",),
    "a//b": ("a%2F%2Fb",),
    "..": ("%2E.",),
    ".hidden": (".hidden",),
    "%default%": ("%25default%25",),
    ".nbdfs-status": ("%2Enbdfs-status",),  # (the daemon's status file has that name)
    ".nbdfs-status/x": ("%2Enbdfs-status%2Fx",),
}


def test_documented_examples() -> None:
    paths = export_paths(CASES)
    assert paths == CASES
    assert all(export_name(p) == n for n, p in paths.items())


def test_a_name_that_is_also_a_directory_stays_whole() -> None:
    paths = export_paths(["a", "a/b", "a/c/d"])
    assert paths["a"] == ("a",)
    assert paths["a/b"] == ("a%2Fb",) and paths["a/c/d"] == ("a%2Fc%2Fd",)


def test_long_components_are_cut_but_stay_unique() -> None:
    long1, long2 = "x" * 300, "x" * 299 + "y"
    paths = export_paths([long1, long2])
    assert paths[long1] != paths[long2]
    assert all(len(c.encode()) <= 255 for p in paths.values() for c in p)


@given(
    st.lists(
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=40),
        max_size=12,
        unique=True,
    )
)
def test_paths_are_unique_valid_and_reversible(names: list[str]) -> None:
    paths = export_paths(names)
    assert len(set(paths.values())) == len(names)
    files = set(paths.values())
    for name, path in paths.items():
        assert all(c not in ("", ".", "..") and "/" not in c and "\0" not in c for c in path)
        assert path[0] != STATUS_FILE
        assert not any(path[:i] in files for i in range(1, len(path)))  # no file is a directory
        if all(len(c.encode()) <= 255 for c in path):
            assert export_name(path) == name

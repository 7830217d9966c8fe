"""Provenance: the code hash changes with any source change and names what ran."""
from ptqbench import environment


def test_tree_hash_follows_paths_and_contents(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "data.txt").write_text("not code")
    first, n = environment.tree_sha256(tmp_path / "pkg")
    assert n == 1 and len(first) == 64
    (tmp_path / "pkg" / "data.txt").write_text("changed, but not code")
    assert environment.tree_sha256(tmp_path / "pkg")[0] == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert environment.tree_sha256(tmp_path / "pkg")[0] != first
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # same bytes, other file
    assert environment.tree_sha256(tmp_path / "pkg")[0] != first


def test_code_identity_covers_core_and_builtin_plugins():
    ident = environment.code_identity()
    assert set(ident) == {"ptqbench", "ptqbench_plugins"}
    assert all(len(v["sha256"]) == 64 and v["files"] > 5 for v in ident.values())

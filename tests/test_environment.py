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


def test_a_shipped_copy_records_the_commit_it_was_given(monkeypatch):
    """A working tree copied to a GPU machine carried a stale .git: its records named a commit
    three commits old. PTQBENCH_SOURCE_COMMIT names the real one, marked as given."""
    from ptqbench.environment import git_info

    monkeypatch.setenv("PTQBENCH_SOURCE_COMMIT", "0123abc")
    git_info.cache_clear()
    try:
        assert git_info() == {"commit": "0123abc", "dirty": None,
                              "source": "PTQBENCH_SOURCE_COMMIT"}
    finally:
        monkeypatch.delenv("PTQBENCH_SOURCE_COMMIT")
        git_info.cache_clear()
    assert git_info().get("source") is None

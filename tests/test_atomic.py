"""Atomic writes: the new file or directory replaces the old one whole, or not at all."""

import pytest

from mergekit_wudi.atomic import write_atomically


def test_a_file_and_a_directory_replace_what_was_there(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    write_atomically(target, lambda partial: partial.write_text("new"))
    assert target.read_text() == "new"
    directory = tmp_path / "cache" / "expert"
    directory.mkdir(parents=True)
    (directory / "stale").write_text("x")
    write_atomically(directory, lambda partial: (partial.mkdir(), (partial / "weights").write_text("w")))
    assert sorted(path.name for path in directory.iterdir()) == ["weights"]
    assert sorted(path.name for path in tmp_path.rglob("*.partial")) == []


def test_a_stopped_write_leaves_the_old_one_and_the_next_run_starts_clean(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "whole").write_text("old")

    def stopped(partial):
        partial.mkdir()
        (partial / "half").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, stopped)
    assert [path.name for path in target.iterdir()] == ["whole"]
    write_atomically(target, lambda partial: (partial.mkdir(), (partial / "new").write_text("n")))
    assert [path.name for path in target.iterdir()] == ["new"]

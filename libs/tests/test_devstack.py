"""The launcher's supervisor: a dead process is restarted, with exponential backoff."""

from modelplex_kit.devstack import Stack


def test_a_dead_process_is_restarted_with_backoff(tmp_path):
    stack = Stack(tmp_path / "catalog.yaml", log_dir=tmp_path)
    stack._spawn("zen", "this", {})  # `python -m this` prints and exits at once: a process that dies
    proc = stack.processes[0]
    try:
        proc.popen.wait(timeout=30)
        assert "restarting in 1 s" in stack.supervise(now=100.0)[0]
        assert stack.supervise(now=100.5) == []  # still backing off
        assert "restarted" in stack.supervise(now=101.1)[0] and proc.restarts == 1
        proc.popen.wait(timeout=30)
        assert "restarting in 2 s" in stack.supervise(now=200.0)[0]  # the second crash waits longer
        assert "The Zen of Python" in (tmp_path / "zen.log").read_text()  # the restart appended to its log
    finally:
        stack.stop()

"""The keys file and the `modelplex` CLI that edits it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from modelplex_gatekeeper.keys import KeyRing, ensure_dev_file


def cli(*args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).with_name("modelplex")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=False)


def test_create_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    path = tmp_path / "keys.yaml"
    made = cli("keys", "create", "--name", "ci", "--project", "research", "--rpm", "10", "--tpm", "1000",
               "--max-concurrent", "2", "--daily-tokens", "5000", "--models", "smollm2-*", "--models", "minilm",
               "--file", str(path))
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-mpx-") and len(key) > 30
    assert key not in path.read_text()
    record = KeyRing(path).find(key)
    assert record is not None and record.name == "ci" and record.project == "research"
    assert (record.rpm, record.tpm, record.max_concurrent, record.daily_tokens) == (10, 1000, 2, 5000)
    assert record.models == ("smollm2-*", "minilm")

    listed = cli("keys", "list", "--file", str(path))
    assert "ci" in listed.stdout and key not in listed.stdout and key[-3:] in listed.stdout

    assert cli("keys", "revoke", "ci", "--file", str(path)).returncode == 0
    assert KeyRing(path).find(key) is None
    assert "revoked" in cli("keys", "list", "--file", str(path)).stdout


def test_duplicate_names_and_bad_names_are_refused(tmp_path):
    path = tmp_path / "keys.yaml"
    assert cli("keys", "create", "--name", "a", "--file", str(path)).returncode == 0
    again = cli("keys", "create", "--name", "a", "--file", str(path))
    assert again.returncode != 0 and "exists" in again.stderr
    bad = cli("keys", "create", "--name", "a b'; DROP", "--file", str(path))
    assert bad.returncode != 0 and "key name" in bad.stderr
    assert cli("keys", "revoke", "nobody", "--file", str(path)).returncode != 0


def test_ring_follows_edits_and_keeps_the_last_good_file(tmp_path):
    path = tmp_path / "keys.yaml"
    ensure_dev_file(path, "sk-modelplex-dev")
    ring = KeyRing(path)
    assert ring.find("sk-modelplex-dev") is not None
    assert ring.find("sk-modelplex-de") is None
    key = cli("keys", "create", "--name", "new", "--file", str(path)).stdout.strip().splitlines()[-1]
    time.sleep(0.01)
    assert ring.reload() and ring.find(key) is not None
    path.write_text("salt: [broken")
    ring.reload()
    assert ring.find(key) is not None  # a bad edit does not lock everyone out

"""API keys: the YAML file, its hashes, and a ring that follows the file's changes.

The file never holds a key in clear. It has one random ``salt`` (a string) and, per
key, the hex SHA-256 of the UTF-8 of ``salt + key`` (the Helm chart computes the same
with sprig's sha256sum for the key it generates): finding a presented key is one hash and one dict
lookup, and a leaked file does not give anyone a key (keys are 192 random bits,
so a fast hash is as good as a slow one against guessing).

    salt: 3f0c...
    keys:
      - name: ci-bot
        project: research
        hash: 9a1e...
        hint: sk-mpx…k2Q            # the masked key, for people reading `keys list`
        models: ["smollm2-*"]
        rpm: 600                     # requests per minute; 0 = no limit
        tpm: 200000                  # tokens per minute; 0 = no limit
        max_concurrent: 8            # 0 = no limit
        daily_tokens: 0              # 0 = no daily budget
        enabled: true
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-mpx-"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    hash: str
    project: str = "default"
    hint: str = ""
    models: tuple[str, ...] = ("*",)
    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    daily_tokens: int = 0
    enabled: bool = True

    @classmethod
    def from_mapping(cls, raw: dict) -> KeyRecord:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"key {raw.get('name')!r}: unknown fields {sorted(unknown)}")
        record = cls(**{**raw, "models": tuple(raw.get("models") or ("*",))})
        if not isinstance(record.name, str) or not _NAME.fullmatch(record.name):
            raise ValueError(f"key name {record.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        for limit in ("rpm", "tpm", "max_concurrent", "daily_tokens"):
            if not isinstance(getattr(record, limit), int) or getattr(record, limit) < 0:
                raise ValueError(f"key {record.name!r}: {limit} must be a whole number >= 0")
        return record

    def to_mapping(self) -> dict:
        return {**asdict(self), "models": list(self.models)}


@dataclass
class KeysFile:
    salt: str = field(default_factory=lambda: secrets.token_hex(16))
    keys: list[KeyRecord] = field(default_factory=list)

    def digest(self, key: str) -> str:
        return hashlib.sha256((self.salt + key).encode("utf-8", "surrogateescape")).hexdigest()

    def named(self, name: str) -> KeyRecord | None:
        return next((k for k in self.keys if k.name == name), None)

    @classmethod
    def parse(cls, text: str) -> KeysFile:
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("salt"), str) or not raw["salt"]:
            raise ValueError("a keys file needs a `salt` and a `keys` list")
        keys = [KeyRecord.from_mapping(entry) for entry in raw.get("keys") or []]
        names = [k.name for k in keys]
        if len(names) != len(set(names)):
            raise ValueError("key names must be unique")
        return cls(raw["salt"], keys)

    @classmethod
    def load(cls, path: Path) -> KeysFile:
        return cls.parse(path.read_text())

    def save(self, path: Path) -> None:
        """Written whole to a temporary file and renamed over the old one: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump({"salt": self.salt, "keys": [k.to_mapping() for k in self.keys]}, sort_keys=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".yaml")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def add(self, key: str, record: KeyRecord) -> KeyRecord:
        if self.named(record.name):
            raise ValueError(f"a key named {record.name!r} exists already")
        record = KeyRecord(**{**asdict(record), "hash": self.digest(key), "hint": masked(key)})
        self.keys.append(record)
        return record


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def masked(key: str) -> str:
    return f"{key[:6]}…{key[-3:]}" if len(key) >= 12 else "***"


def ensure_dev_file(path: Path, key: str = "sk-modelplex-dev") -> bool:
    """Creates a keys file holding the dev key with generous limits, if there is none. True when created."""
    if path.exists():
        return False
    keys = KeysFile()
    keys.add(key, KeyRecord(name="dev", hash="", project="dev", rpm=100_000, tpm=100_000_000, max_concurrent=1024))
    keys.save(path)
    return True


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()  # follows the symlinks a mounted Secret swaps atomically
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


class KeyRing:
    """The keys in force, by hash; follows its file (a bad edit keeps the last good keys)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._file = KeysFile(salt="00", keys=[])
        self._by_hash: dict[str, KeyRecord] = {}
        # Called with the names of keys edited or removed by a reload (leases of them are dropped).
        self._listeners: list[Callable[[list[str]], None]] = []
        self.reload()

    def listen(self, listener: Callable[[list[str]], None]) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[list[str]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def find(self, key: str) -> KeyRecord | None:
        """The enabled key with this secret, or None (unknown and revoked look the same)."""
        record = self._by_hash.get(self._file.digest(key))
        return record if record is not None and record.enabled else None

    def named(self, name: str) -> KeyRecord | None:
        return self._file.named(name)

    def reload(self) -> bool:
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            loaded = KeysFile.load(self.path)
        except FileNotFoundError:
            log.error("keys file not found; every key is refused", extra={"path": str(self.path)})
            loaded = KeysFile(salt="00", keys=[])
        except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
            log.error(
                "keys file is invalid; keeping the keys in force", extra={"path": str(self.path), "why": str(exc)}
            )
            return False
        before = {k.name: k for k in self._file.keys}
        self._file = loaded
        self._by_hash = {k.hash: k for k in loaded.keys}
        after = {k.name: k for k in loaded.keys}
        changed = [name for name, record in before.items() if after.get(name) != record]
        if changed:
            for listener in list(self._listeners):
                listener(changed)
        log.info("keys loaded", extra={"path": str(self.path), "keys": len(loaded.keys)})
        return True

    async def follow(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                self.reload()

"""`modelplex keys create|list|revoke`: manage the keys file a running gatekeeper follows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modelplex_gatekeeper.keys import KeyRecord, KeysFile, new_key
from modelplex_gatekeeper.settings import DEFAULT_KEYS_FILE


def default_file() -> Path:
    return Path(os.environ.get("MODELPLEX_KEYS_FILE") or DEFAULT_KEYS_FILE)


def _load(path: Path, create: bool = False) -> KeysFile:
    if not path.exists():
        if create:
            return KeysFile()
        raise SystemExit(f"modelplex: no keys file at {path} (create a key first, or pass --file)")
    try:
        return KeysFile.load(path)
    except ValueError as exc:
        raise SystemExit(f"modelplex: {path}: {exc}") from None


def create(args: argparse.Namespace) -> None:
    keys = _load(args.file, create=True)
    key = new_key()
    record = KeyRecord(
        name=args.name,
        hash="",
        project=args.project,
        models=tuple(args.models or ("*",)),
        rpm=args.rpm,
        tpm=args.tpm,
        max_concurrent=args.max_concurrent,
        daily_tokens=args.daily_tokens,
    )
    try:
        KeyRecord.from_mapping({**record.to_mapping(), "hash": "x"})  # validates name and limits
        keys.add(key, record)
    except ValueError as exc:
        raise SystemExit(f"modelplex: {exc}") from None
    keys.save(args.file)
    print(f"Created key {args.name!r} (project {args.project}) in {args.file}. It is shown once; store it now:")
    print(key)


def list_keys(args: argparse.Namespace) -> None:
    keys = _load(args.file)
    print(f"{'NAME':<20} {'PROJECT':<14} {'KEY':<12} {'RPM':>7} {'TPM':>9} {'CONC':>5} {'DAILY':>9} STATE  MODELS")
    for k in keys.keys:
        state = "active" if k.enabled else "revoked"
        print(
            f"{k.name:<20} {k.project:<14} {k.hint:<12} {k.rpm:>7} {k.tpm:>9} {k.max_concurrent:>5} "
            f"{k.daily_tokens:>9} {state:<6} {','.join(k.models)}"
        )


def revoke(args: argparse.Namespace) -> None:
    keys = _load(args.file)
    record = keys.named(args.name)
    if record is None:
        raise SystemExit(f"modelplex: no key named {args.name!r} in {args.file}")
    keys.keys = [
        KeyRecord(**{**k.to_mapping(), "models": k.models, "enabled": False}) if k is record else k for k in keys.keys
    ]
    keys.save(args.file)
    print(f"Revoked key {args.name!r}; a running gatekeeper refuses it within 2 seconds.")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="modelplex", description="Manage Modelplex.")
    commands = root.add_subparsers(dest="group", required=True)
    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)

    def with_file(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--file",
            type=Path,
            default=default_file(),
            help=f"keys file (default: $MODELPLEX_KEYS_FILE or {DEFAULT_KEYS_FILE})",
        )
        return sub

    made = with_file(keys.add_parser("create", help="create a key; it is printed once"))
    made.add_argument("--name", required=True)
    made.add_argument("--project", default="default")
    made.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    made.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: no limit)")
    made.add_argument("--max-concurrent", type=int, default=0, help="requests at once (0: no limit)")
    made.add_argument("--daily-tokens", type=int, default=0, help="tokens per UTC day (0: no budget)")
    made.add_argument("--models", action="append", metavar="GLOB", help="models it may use (repeatable; default *)")
    made.set_defaults(run=create)
    with_file(keys.add_parser("list", help="list keys (no secrets)")).set_defaults(run=list_keys)
    revoked = with_file(keys.add_parser("revoke", help="revoke a key by name"))
    revoked.add_argument("name")
    revoked.set_defaults(run=revoke)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

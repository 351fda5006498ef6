"""Shared kit for Modelplex services.

Everything a service needs besides its own logic: typed settings from the
environment, the gRPC server bootstrap, logging, telemetry and the one table
that maps gRPC status codes to OpenAI errors.
"""

import os as _os

# gRPC's fork support (its pthread_atfork handlers) aborts a child forked while this process's gRPC threads
# are busy ("ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED") in about one fork in five:
# subprocess.Popen with a preexec_fn (modelplex_kit.children) forks, and make run, the jobs tests and the
# engine fixtures spawn from processes with live channels. No Modelplex process uses gRPC across a fork (every
# child execs at once), so it is off unless the environment says otherwise. gRPC reads the variable when it is
# imported: this runs first wherever the kit is imported before grpc (make run, the tests' conftest.py).
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

"""A stop signal while a script starts (Ctrl-C while torch loads, say): `interrupted` and exit 130,
as run_cli ends an interrupted main, never a traceback. Tiny and first to load: it imports only
`os` and `signal`, so that a script installs it before its heavy imports."""
import os
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a closed terminal


def stop_quietly(signum, frame):
    """Exit at once: nothing has started that needs cleaning up, and an exception raised here could
    land inside an extension's import and leave the process half-loaded and running."""
    os.write(2, b"interrupted\n")
    os._exit(130)


def replaceable(handler):
    """Whether a signal's handler is Python's default or this module's, not one set on purpose (nohup's
    ignored SIGHUP stays ignored)."""
    return handler in (signal.SIG_DFL, signal.default_int_handler, stop_quietly)


def quiet_start():
    """Called first by a script run as a program: until run_cli runs main, a stop signal prints
    `interrupted` and exits 130."""
    for sig in STOP_SIGNALS:
        if replaceable(signal.getsignal(sig)):
            signal.signal(sig, stop_quietly)

"""`make dashboard`: the app's Optuna studies in optuna-dashboard.

    python -m lstm_core.dashboard [STORAGE] [--host 127.0.0.1] [--port 8080] [--repair-journal]

STORAGE is any storage the app writes: a database URL, or journal:PATH (Optuna's journal file); without
one, the app's own sqlite:///SAVES/optuna.db ($LSTM_SAVES, else saves/). It is opened by storage.make_storage,
so the forms the app accepts and the ones the dashboard reads cannot drift apart. A problem (the extra not
installed, a storage that cannot be opened, a port in use or out of range, a bad flag) is one line and
exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from .config import ConfigError
from .storage import JOURNAL, REPAIRED, default_storage, journal_path, make_storage, repair_journal, sqlite_path

EXIT_USAGE = 2
MISSING_EXTRA = ("optuna-dashboard is not installed: `make dashboard` installs it, or "
                 "`pip install -e '.[dashboard]'`")


def open_storage(url: str | None = None) -> tuple[str, optuna.storages.BaseStorage]:
    """The storage URL (the app's default when None) and the storage it names, refused with one ConfigError
    when it holds no studies to show: a missing file is far more often a mistyped path or another saves
    folder than a wish for an empty dashboard, and opening it would leave an empty database behind."""
    url = url or default_storage()
    if "://" not in url and not url.startswith(JOURNAL):
        # optuna-dashboard's own CLI takes a bare journal file path; the app names every storage by URL
        raise ConfigError(f"{url!r} is not a storage URL: write sqlite:///PATH for a SQLite file or "
                          f"{JOURNAL}PATH for a journal file")
    path = sqlite_path(url) or journal_path(url)
    if path is not None and path.parent.is_dir() and not path.exists():
        raise ConfigError(f"cannot open the study storage {url!r}: no such file {path} (no study has been "
                          "run there: start one on the Tuning page or with `python -m lstm_core tune`)")
    # a reader: heartbeats are for the workers that run trials
    return url, make_storage(url, heartbeat=False)


class ThreadedServer(ThreadingMixIn, WSGIServer):
    """The page asks for several things at once; Ctrl-C does not wait for the requests in flight."""
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args) -> None:   # the page polls its study every few seconds: no line per request
        pass


def serve(storage: optuna.storages.BaseStorage, host: str, port: int) -> WSGIServer:
    """optuna-dashboard's app over `storage`, bound to host:port (a taken port fails here) but not yet
    serving: server.serve_forever() does. The WSGI app rather than optuna_dashboard.run_server, whose server
    announces that it listens before it binds and handles one request at a time."""
    from optuna_dashboard import wsgi
    return make_server(host, port, wsgi(storage), server_class=ThreadedServer, handler_class=QuietHandler)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):      # one line, as every other refusal here, not argparse's usage dump
        raise ConfigError(message)


def port(text: str) -> int:
    """A TCP port, checked here: the socket layer refuses one out of range with an OverflowError."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: a whole number from 0 to 65535") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range: ports run from 0 to 65535")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m lstm_core.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("storage", nargs="?", help="a database URL or journal:PATH (default: the app's "
                                                   "sqlite:///SAVES/optuna.db)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=port, default=8080)
    parser.add_argument("--repair-journal", action="store_true", help="cut the torn last line a killed writer "
                        "left in a journal:PATH storage, after copying the file to PATH.bak")
    try:
        args = parser.parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import optuna_dashboard  # noqa: F401 - the `dashboard` extra, checked before the storage is opened
    except ImportError:
        print(f"error: {MISSING_EXTRA}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.repair_journal:
            backup = repair_journal(args.storage or default_storage())
            if backup:
                print(REPAIRED.format(journal=journal_path(args.storage), backup=backup), file=sys.stderr, flush=True)
        url, storage = open_storage(args.storage)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        server = serve(storage, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc.strerror or exc} (choose another port with "
              "--port, or DASHBOARD_PORT=... for make)", file=sys.stderr)
        return EXIT_USAGE
    count = len(storage.get_all_studies())
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ ({count} {'study' if count == 1 else 'studies'} "
          f"in {url}); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

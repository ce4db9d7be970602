"""`make dashboard`: the app's Optuna studies in optuna-dashboard.

    python -m lstm_core.dashboard [STORAGE] [--artifacts STORE] [--host 127.0.0.1] [--port 8080]
                                  [--repair-journal]

STORAGE is any storage the app writes: a database URL, or journal:PATH (Optuna's journal file); without
one, the app's own sqlite:///SAVES/optuna.db ($LSTM_SAVES, else saves/). It is opened by storage.make_storage,
so the forms the app accepts and the ones the dashboard reads cannot drift apart. A problem (the extra not
installed, a storage that cannot be opened, a port in use or out of range, a bad flag) is one line and
exit status 2.

The trials' results (`tune --artifacts STORE`) show on each trial's page, served from the artifact store:
--artifacts STORE (a folder or s3://BUCKET[/PREFIX], as for tune), else the one store the studies record.
A store named with the flag that cannot be opened or read is refused like a bad storage: it was asked for.
A recorded one is only what the workers wrote, perhaps on another machine, so one that cannot be reached
here, or studies that record different stores (the dashboard serves one), is a one-line warning and the
studies are served without their artifacts; --artifacts picks the store then.
"""
from __future__ import annotations

import argparse
import sys
import uuid
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from .artifacts import RETRIES, STORE_ATTR, StoreError, endpoint, failure_text, open_store, store_spec
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


def readable_store(spec: str):
    """The artifact store `spec` names (artifacts.open_store), retried by Optuna's Backoff as the workers'
    uploads are, once it has answered a read: a mistyped bucket, wrong credentials or an unreachable endpoint
    show now, in one StoreError, rather than as a failed request on some trial's page."""
    from optuna.artifacts import Backoff
    from optuna.artifacts.exceptions import ArtifactNotFound

    store = open_store(spec)
    try:
        store.open_reader(f"read-probe-{uuid.uuid4()}").close()    # no such artifact: the answer expected
    except ArtifactNotFound as exc:
        # Optuna's S3 store takes every 404 for a missing artifact, a missing bucket's too
        error = getattr(exc.__cause__, "response", {}).get("Error", {})
        if error.get("Code") == "NoSuchBucket":
            raise StoreError(f"cannot read the artifact store {store_spec(spec)}{endpoint(store)}: no such bucket "
                             f"{error.get('BucketName') or store_spec(spec)}") from None
    except Exception as exc:  # noqa: BLE001 - each backend words a refused read its own way
        raise StoreError(f"cannot read the artifact store {store_spec(spec)}{endpoint(store)}: "
                         f"{failure_text(exc)}") from None
    return Backoff(store, **RETRIES)


def recorded_stores(storage: optuna.storages.BaseStorage) -> dict[str, list[str]]:
    """{store: the studies that record it} over every study in `storage` (artifacts.STORE_ATTR)."""
    stores: dict[str, list[str]] = {}
    for study in storage.get_all_studies():
        spec = study.user_attrs.get(STORE_ATTR)
        if isinstance(spec, str) and spec.strip():
            try:
                spec = store_spec(spec)     # one folder written two ways is one store
            except StoreError:
                pass                        # opening it says what is wrong with it
            stores.setdefault(spec, []).append(study.study_name)
    return stores


def artifact_store(storage: optuna.storages.BaseStorage,
                   spec: str | None = None) -> tuple[Any, str | None, str | None]:
    """(the store to serve or None, its name, a warning or None): `spec` when given (StoreError when it cannot
    be opened or read), else the one store the studies record (see the module's docstring)."""
    if spec is not None:
        return readable_store(spec), store_spec(spec), None
    stores = recorded_stores(storage)
    if not stores:
        return None, None, None
    if len(stores) > 1:
        named = "; ".join(f"{store} ({', '.join(studies)})" for store, studies in sorted(stores.items()))
        return None, None, (f"the studies record different artifact stores, {named}: serving them without "
                            "artifacts; choose one with --artifacts STORE (ARTIFACTS=... for make)")
    [(recorded, studies)] = stores.items()
    try:
        return readable_store(recorded), recorded, None
    except StoreError as exc:
        return None, None, (f"{exc} (recorded by {', '.join(studies)}): serving the studies without artifacts; "
                            "name a store this machine reaches with --artifacts STORE (ARTIFACTS=... for make)")


def serve(storage: optuna.storages.BaseStorage, host: str, port: int, store=None) -> WSGIServer:
    """optuna-dashboard's app over `storage` and the artifact store `store` (None: trials' artifacts are not
    shown), bound to host:port (a taken port fails here) but not yet serving: server.serve_forever() does.
    The WSGI app rather than optuna_dashboard.run_server, whose server announces that it listens before it
    binds and handles one request at a time."""
    from optuna_dashboard import wsgi
    return make_server(host, port, wsgi(storage, artifact_store=store), server_class=ThreadedServer,
                       handler_class=QuietHandler)


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
    parser.add_argument("--artifacts", metavar="STORE", help="the artifact store of the trials' results, a folder "
                        "or s3://BUCKET[/PREFIX] (default: the one the studies record)")
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
        store, spec, warning = artifact_store(storage, args.artifacts)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    try:
        server = serve(storage, args.host, args.port, store)
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc.strerror or exc} (choose another port with "
              "--port, or DASHBOARD_PORT=... for make)", file=sys.stderr)
        return EXIT_USAGE
    count = len(storage.get_all_studies())
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ ({count} {'study' if count == 1 else 'studies'} "
          f"in {url}{', artifacts from ' + spec if spec else ''}); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

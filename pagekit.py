"""Streamlit helpers the pages share (lstm_core has no Streamlit in it)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import get_script_run_ctx


def leave_legacy_navigation() -> None:
    """Rerun through streamlit_app.py when this run is one of Streamlit's legacy multipage mode.

    Because the pages live in a folder named pages/, a fresh server runs in that mode until
    streamlit_app.py has run once: a first request for a page's URL (a tab left open on /train
    reconnecting to a restarted server) runs that page on its own, with the folder's file names (and the
    entrypoint itself) as navigation. The test is per run, not Streamlit's server-wide flag: tabs that
    reconnect together all start in that mode, and the first to leave it clears the flag for the rest.
    """
    manager = get_script_run_ctx().pages_manager
    entrypoint = Path(manager.main_script_path).resolve()
    pages = manager.get_pages().values()
    if len(pages) > 1 and any(Path(p["script_path"]).resolve() == entrypoint for p in pages):
        PagesManager.uses_pages_directory = False
        st.rerun()

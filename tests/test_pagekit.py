"""pagekit's guarded use of Streamlit's private pages manager: used where this Streamlit is one it was tested
with, left alone (the page drawn as it is) anywhere else."""
from types import SimpleNamespace

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app import pagekit

from conftest import REPO


class FakeManager:
    uses_pages_directory = True

    def __init__(self, pages: list[str]):
        self.main_script_path = str(REPO / "streamlit_app.py")
        self.pages = {str(i): {"script_path": str(REPO / p)} for i, p in enumerate(pages)}

    def get_pages(self):
        return self.pages


@pytest.fixture
def legacy(monkeypatch):
    """A run in Streamlit's legacy pages/ mode (the entrypoint listed among the pages), with st.rerun recorded."""
    FakeManager.uses_pages_directory = True
    manager = FakeManager(["streamlit_app.py", "pages/home.py", "pages/train.py"])
    monkeypatch.setattr("streamlit.runtime.scriptrunner.get_script_run_ctx",
                        lambda: SimpleNamespace(pages_manager=manager))
    reruns = []
    monkeypatch.setattr(st, "rerun", lambda: reruns.append(1))
    return reruns


def test_a_legacy_run_leaves_that_mode_and_reruns(legacy):
    pagekit.leave_legacy_navigation()
    assert legacy == [1] and FakeManager.uses_pages_directory is False


def test_the_apps_own_navigation_is_left_alone(monkeypatch, legacy):
    manager = FakeManager(["pages/home.py", "pages/train.py"])           # st.navigation's pages
    monkeypatch.setattr("streamlit.runtime.scriptrunner.get_script_run_ctx",
                        lambda: SimpleNamespace(pages_manager=manager))
    pagekit.leave_legacy_navigation()
    assert legacy == [] and FakeManager.uses_pages_directory is True


@pytest.mark.parametrize("version", ["1.65.0", "2.0.0", "3.1"])
def test_a_streamlit_outside_the_tested_versions_is_left_alone(monkeypatch, legacy, version):
    monkeypatch.setattr(st, "__version__", version)
    assert pagekit.pages_manager() is None
    pagekit.leave_legacy_navigation()
    assert legacy == [] and FakeManager.uses_pages_directory is True


def test_a_streamlit_without_that_private_api_is_left_alone(monkeypatch, legacy):
    monkeypatch.setattr("streamlit.runtime.scriptrunner.get_script_run_ctx",
                        lambda: SimpleNamespace(pages_manager=SimpleNamespace()))
    pagekit.leave_legacy_navigation()
    assert legacy == []


def test_this_streamlit_is_a_tested_one_and_has_the_api():
    """The installed Streamlit is within the tested versions and its pages manager has what is used: if a
    release renames it, this fails here rather than the helper going quiet in the app."""
    low, high = pagekit.LEGACY_NAVIGATION_TESTED
    assert low <= pagekit.streamlit_version() < high

    def script():
        import streamlit as st

        from app import pagekit
        st.write(str(pagekit.pages_manager() is not None))

    at = AppTest.from_function(script).run()
    assert not at.exception and at.markdown[0].value == "True"

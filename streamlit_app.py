"""LSTM Studio's entrypoint: it only routes; each page lives in pages/.

Because that folder is named pages/, a fresh server runs in Streamlit's legacy multipage mode until this
script has run once; each page starts by leaving that mode (app.pagekit.leave_legacy_navigation).
"""
import streamlit as st

from lstm_core.runs import RunError, check_saves

st.set_page_config(page_title="LSTM Studio", layout="wide")
try:
    check_saves()       # a saves root that is a file or read-only: say so above every page, in the CLI's words
except RunError as exc:
    st.error(str(exc))
st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/draw.py", title="Draw", icon=":material/draw:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/table_chart:"),
    st.Page("pages/tuning.py", title="Tuning", icon=":material/tune:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/grid_on:"),
]).run()

"""LSTM Studio's entrypoint: it only routes; each page lives in pages/."""
import streamlit as st

st.set_page_config(page_title="LSTM Studio", layout="wide")
st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
]).run()

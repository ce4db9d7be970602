"""What the pages ask and show, as data: forms, tables, labels and images built from the engine (lstm_core),
plus the Streamlit helpers pages share (pagekit). Data flows one way: lstm_core <- app <- pages."""
# Plotly uses numpy and pandas only if they are in sys.modules, without importing them: while another
# thread is importing one (a second session's first page on a fresh server), it finds it half-initialized
# and a figure fails with "partially initialized module". Every page imports this package before it draws,
# so both are whole before any figure.
import numpy  # noqa: F401
import pandas  # noqa: F401

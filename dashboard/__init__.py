"""The ccamerge Streamlit dashboard (entry point: dashboard/app.py)."""

"""Admission: may this request run, and what does it hold while it runs? See gateway.admission.base."""

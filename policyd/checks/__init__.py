"""The checks: each a pure decision core plus a thin async shell over a narrow store interface."""

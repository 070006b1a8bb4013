"""The Textual chat: a thin shell over kit.launch, kit.history and kit.integrity.

app.py holds the one app factory (make_app) used by `kit chat`, the frozen runtime and the tests.
"""

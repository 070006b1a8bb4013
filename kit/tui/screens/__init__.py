"""One module per screen; each reaches kit's core only through the session it is given."""

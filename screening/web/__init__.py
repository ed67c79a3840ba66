"""The local review page (``dr-screen serve``): Flask app in :mod:`.app`, logins in :mod:`.auth`, the
waitress server in :mod:`.serve`."""

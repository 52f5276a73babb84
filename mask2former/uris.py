"""URIs as they may be shown: in logs, job folders, XComs and error messages."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def without_credentials(text: str) -> str:
    """``text`` (a URI, or a message naming URIs) without the ``user:password@`` part of its URIs."""
    return _USERINFO.sub("", text)

"""MkDocs hooks for the documentation site (``hooks:`` in mkdocs.yml).

The docstrings use Sphinx roles (``:class:`PoolTimeout```); mkdocstrings renders
their text as code but leaves the role's name in front of it. This turns
``:class:<code>X</code>`` into ``<code>X</code>``, and ``~pkg.mod.X`` into ``X`` as
Sphinx shows it; reST's ``::`` before a literal block becomes ``:`` (or nothing when
alone on its line), as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|mod|exc|attr|data|obj|const|py:\w+):<code>(~?)([^<]*)</code>")


def _shown(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Sphinx roles and literal-block markers in rendered docstrings shown as Sphinx would."""
    html = _ROLE.sub(_shown, html)
    html = re.sub(r"<p>::</p>\s*", "", html)
    return html.replace("::</p>", ":</p>")

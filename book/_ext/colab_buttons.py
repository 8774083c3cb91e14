"""Sphinx extension of the book's build: each chapter's Colab button opens its Colab edition.

sphinx-book-theme builds the launch buttons from ``_config.yml``'s repository; after it
(priority 501), this points each page's Colab button at ``book/colab/<chapter>.ipynb``
(:func:`fp4lib.display.notebook.colab_edition_path`), the edition ``tests/colab_edition.py``
writes with the book's markup resolved.
"""

from fp4lib.display.notebook import colab_edition_path


def _point_colab_at_editions(app, pagename, templatename, context, doctree) -> None:
    marker = "/blob/"

    def visit(buttons):
        for button in buttons:
            if isinstance(button, dict):
                if button.get("text") == "Colab" and marker in button.get("url", ""):
                    head, _, tail = button["url"].partition(marker)
                    branch, _, path = tail.partition("/")
                    button["url"] = f"{head}{marker}{branch}/{colab_edition_path(path)}"
                visit(button.get("buttons", []))

    visit(context.get("header_buttons", []))


def setup(app):
    """Sphinx extension: after sphinx-book-theme made its launch buttons (priority 501),
    point each page's Colab button at the page's Colab edition."""
    app.connect("html-page-context", _point_colab_at_editions, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

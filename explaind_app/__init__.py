"""The application on top of the store and the engine: the ``explaind`` command line (:mod:`explaind_app.cli`),
``explaind demo`` (:mod:`explaind_app.demo`: record modular addition while it groks, decompose it) and its HTML
report (:mod:`explaind_app.report`). It may import :mod:`explaind_store` and :mod:`engine`; neither imports it."""

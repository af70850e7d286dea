"""The ``sirenfeed`` command line and the end-to-end demo: the only package that may import every
other (docs/design.md, "Layout")."""

"""The ``pagedgen`` command line: the top of the house, above ``service`` and ``bench``."""

"""alignsearch: fine-grained image-text search (TERAN/CHAN region-word alignment over a TGDT two-stage index).

One installed package over the project's folders: ``alignsearch.models`` (``models/``: encoders, alignment,
training), ``alignsearch.indexer`` (``indexer/``: the on-disk index, the build, the search pipeline),
``alignsearch.service`` (``service/``: the HTTP API and page), ``alignsearch.bench`` (``bench/``), and the
command line in ``alignsearch.cli`` above them all. Data flows models -> indexer -> service; nothing imports
upward."""

__version__ = "0.2.0"

"""vtr's indexer: embedding jobs, the on-disk index, FAISS, search and export.

The stable names (see README, "Python API"); imported lazily so ``import indexer`` stays cheap:

* ``Searcher(index, model=None, device, precision)``: ``search(text)``, ``search_video(path)``,
  ``search_vector(vector)``, each with ``k``, ``group`` and a ``where`` filter; returns ``Hit`` s;
* ``Query.parse(text, cleaning, where=...)``: a query cleaned and checked once (what
  ``Searcher.search`` takes; ``Searcher.query(text)`` builds it with the model's cleaning),
  ``EmptyQuery`` when nothing is left to search;
* ``ItemFilter``: folders / path globs, duration bounds, annotation fields (``FilterError``);
* ``open_index(dir)``: the published index read-only (items, vectors, FAISS);
* ``export_index(index, out, fmt)`` / ``read_export(out)``: vectors and metadata as Parquet or
  clip-retrieval's npy layout.
"""
from __future__ import annotations

from retrieval.lazy import lazy_attributes

_EXPORTS = {
    "Searcher": "indexer.search",
    "Hit": "indexer.search",
    "Moment": "indexer.search",
    "Query": "indexer.query",
    "EmptyQuery": "indexer.query",
    "ItemFilter": "indexer.filters",
    "FilterError": "indexer.filters",
    "open_index": "indexer.store",
    "export_index": "indexer.export",
    "read_export": "indexer.export",
}
__all__ = ["EmptyQuery", "FilterError", "Hit", "ItemFilter", "Moment", "Query", "Searcher", "export_index",
           "open_index", "read_export"]
__getattr__ = lazy_attributes(__name__, _EXPORTS)

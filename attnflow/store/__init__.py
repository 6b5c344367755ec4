"""attnflow's files: the attention cache, the metrics file and the perturbation file, all HDF5.

The package has one module per job, and no module re-exports another's names:

- :mod:`.names`: every dataset, dimension and root attribute name, defined there and nowhere else, and the
  tables of what each dataset and attribute holds (``CACHE_DATASETS``, ``ROOT_ATTRS``, ...);
- :mod:`.validate`: opening a file and checking it against those tables (:func:`~.validate.validate`);
- :mod:`.scales`: the HDF5 dimension scales that name every axis;
- :mod:`.read`: the readers, :func:`~.read.open_cache`, :func:`~.read.open_metrics`,
  :func:`~.read.open_perturbation` (also ``attnflow.open_cache``, ...): every file is checked when it opens
  and every value as it is read; :func:`~.read.describe` lists any attnflow file, also a broken one;
- :mod:`.write`: the specs that fix a file's shapes and identity, and the crash-safe writer;
- :mod:`.assembly`: a run's committed segments moved into the finished file.

The format
----------

``n`` images, ``L`` blocks, ``H`` heads, ``T`` tokens (``p`` prefix = cls + registers, ``P`` patches), ``D``
channels, ``K`` classes, ``m`` skipped inputs. Text is UTF-8.

Every kind holds the root attributes listed below and the datasets ``image_ids`` (n,) the paths as given (a
file-name byte that is not UTF-8 written ``\\udcNN``), ``image_sha256`` (n,) each image file's content digest
(in files written since it was added), ``labels`` (n,) int64 into ``class_names`` (K,) when extracted with
labels, ``skipped`` (m,) and ``skipped_reason`` (m,), and ``fg`` (n, P) float32 object fractions with
``--masks`` (NaN rows for images without a mask).

Attention cache (``schema = attnflow.cache/1``):
    ``magnitude`` (n, L, T) float32; ``token_norm`` (n, L, T) float32 (not in caches of attnflow 0.1);
    ``attn`` (n, L, H, T, T) for ``store=full``; ``attn_rows`` (n, L, H, p, T) for ``store=rows``; ``tokens``
    (n, T, D) float32 with ``--save-tokens``, with the model's final LayerNorm as ``final_norm_weight`` (D,),
    ``final_norm_bias`` (D,) and attr ``final_norm_eps``; with ``--token-layers`` of several blocks
    ``layer_tokens`` (n, S, T, D) instead, the S 0-based blocks in attr ``token_layers`` (one block other
    than the last: ``tokens`` and the attr); float16 with ``--tokens-dtype``. Read with
    :meth:`Cache.attention`, :meth:`Cache.prefix_rows`, :meth:`Cache.magnitude`, :meth:`Cache.token_norm`,
    :meth:`Cache.tokens` (final norm applied), ``labels``, ``fg``, ``image_ids``, ``class_names``, ``skipped``.
Metrics file (``schema = attnflow.metrics/1``):
    ``metrics/<name>`` (n, L, H), (n, L) or (n,) float32 by the metric's level; ``rollout/map`` (n, L, P)
    float32 when full maps were available; ``flow/map`` (n, F, P) float32 with ``--flow``, read out after the
    F blocks of attr ``flow_layers``. Read with :meth:`MetricsFile.values`, :meth:`MetricsFile.rollout_maps`,
    :meth:`MetricsFile.flow_maps`.
Perturbation file (``schema = attnflow.perturb/1``, ``attnflow perturb``):
    R relevance maps, O orders and F fractions, named in that order by the attrs ``relevance``, ``orders``
    and ``fractions``: ``perturb/similarity`` (n, R, O, F) float32 cosine similarity to the clean
    representation; ``perturb/relevance`` (n, R, P) float32 each map over the patches, summing to 1; with
    ``--probe`` ``perturb/correct`` (n, R, O, F) and ``perturb/clean_correct`` (n,) int8, 1 where the probe's
    prediction is right. Read with :meth:`PerturbFile.similarity`, :meth:`PerturbFile.relevance_maps`,
    :meth:`PerturbFile.correct`.

Every axis is named by an HDF5 dimension scale (:func:`~.scales.attach_dimension_scales`: an empty dataset
at the root per dimension, ``image``, ``layer``, ``head``, ``token``, ``query``, ``key``, ``row``,
``patch``, ``channel``, ``class``, ``skipped_input``, ``token_layer``, ``flow_layer``, ``relevance``,
``order``, ``fraction``; the ``dims`` of the tables of :mod:`.names`), so h5py and xarray
(``engine="h5netcdf"``) show named dimensions. Files written by attnflow 0.1 have no scales and read the
same.

Root attributes (:data:`~.names.ROOT_ATTRS` says, for each, what its value must be, which kinds of file
must carry it, what it means and whether it is part of a run's identity; a metrics file inherits its
cache's but for the run's own bookkeeping):

- the file: ``schema``, ``attnflow_version`` (the attnflow that wrote it), ``created`` (ISO 8601, UTC),
  ``complete``;
- the model: ``model`` (timm name), ``label``, ``family``, ``weights`` (pretrained, checkpoint or random),
  ``checkpoint``, ``checkpoint_sha256``, ``checkpoint_key``, ``masks_sha256``;
- the token layout: ``num_layers`` (L), ``num_heads`` (H), ``num_tokens`` (T), ``num_prefix_tokens`` (p),
  ``has_cls``, ``num_registers``, ``grid_size`` ([h, w], P = h * w), ``patch_size``, ``img_size``;
- how the run saw its inputs: ``preprocessing`` (JSON of timm's data config), ``amp``, ``working_dir``,
  ``store``, ``dtype``, ``compression``, ``has_labels``, ``has_tokens``, ``token_layers``, ``tokens_dtype``,
  ``has_masks``, ``magnitude_update``, ``final_norm_eps``;
- bookkeeping: ``n_images`` (n), ``inputs_sha256``, ``n_inputs``, ``n_inputs_done``, ``n_skipped`` (m),
  ``shards`` (a distributed run's shard files);
- a metrics file's own: ``fusion``, ``discard_ratio``, ``artifact_factor`` or ``artifact_norm``, ``source``
  (the cache), ``flow_layers``;
- a perturbation file's own: ``relevance``, ``orders``, ``fractions``, ``mode``, ``readout``,
  ``relevance_layer``, ``seed``, ``relevance_heads``, ``probe_head``, ``probe_head_sha256``.

Writing
-------

The writer (:class:`~.write.RowFileWriter`) writes a run into the folder ``<path>.partial/`` and ``<path>``
appears only once complete, so a finished path always holds a finished file and a killed run loses at most
the batch in flight. The folder holds:

- ``attnflow-run.json``, the marker that proves attnflow made the folder (the run id and the file it
  belongs to; a folder without it, or a link, is never written into nor deleted);
- ``manifest.json``: the file's attributes, class names, companion file (``extract --metrics`` writes two
  files side by side) and a random run id, written once, atomically;
- ``lock``: a POSIX record lock held by the one process writing the run (its pid and host inside);
- ``seg-NNNNNNNN.h5``, numbered from 0: one per committed batch, the batch's rows of every per-image
  dataset, with the attributes ``n_inputs_start``, ``n_inputs_done`` and ``run_id``; written as a ``*.tmp``
  and renamed into place, so a segment exists complete or not at all (a leftover ``*.tmp`` is the batch
  that was cut off, discarded on resume);
- while finishing, ``assembly.h5`` (the file being assembled) and ``assembly-state.h5`` (its committed
  length, the pages rewritten inside it, the first segment not yet in it, the rows carried to the next
  step, every segment's record): segments are moved in a step at a time and each deleted once safely in
  (:class:`~.assembly.Assembly`).

``--resume`` checks that the manifest's identity attributes and class names match this run and that the
segments form one unbroken chain of it, then continues after the last (or finishes the assembly). Once
assembled, ``assembly.h5`` is renamed to ``<path>`` and the folder removed, the manifest first.

A distributed run (``attnflow.distributed``) writes one such file per rank,
``<path>.shards/rank-RRR-of-WWW.h5``; ``<path>`` then holds the large per-image datasets as HDF5 virtual
datasets over the shards, by paths relative to its folder (the root attribute ``shards`` lists them), and
copies of the rest. A reader refuses a virtual source outside that folder, a missing one, and any external
link.
"""

__all__ = []

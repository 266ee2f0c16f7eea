"""``import tinker`` in a process started by ``python -m loops_async.tinker``, or by one of its
children (``subprocess``, ``multiprocessing`` spawn workers), which inherit ``PYTHONPATH``.

The runner puts this directory first on ``PYTHONPATH`` once it has decided to run with the
layer (no real tinker, or ``--shadow``); importing ``tinker`` here installs the layer, which
takes this module's place in ``sys.modules``, so ``import tinker`` gives ``loops_async.tinker``.
"""

from loops_async.tinker import install as _install

_install(shadow=True)

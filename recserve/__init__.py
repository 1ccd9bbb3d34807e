"""recserve: contracts and offline tools shared by every recserve process.

Holds the error tree, the model artifact format, importers, synthetic models and the CLI.
It never imports the daemons (``gateway``, ``shardd``); they import it.
"""

__version__ = "0.1.0"

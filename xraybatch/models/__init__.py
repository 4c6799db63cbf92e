"""Model bundles (``registry``), network definitions (``nets``) and the target/code table (``findings``)."""

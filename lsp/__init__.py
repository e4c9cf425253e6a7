"""codelm.lsp: the language server editors start (`codelm-lsp`); never imports torch."""

__version__ = "0.1.0"

"""The long explanations of diagnostic codes, one Markdown file per code (shipped as
``surgery.errordocs`` and printed by ``surgery explain EXXXX``)."""

"""The grammar of the .surg language (surgery.lark), shipped as package data."""

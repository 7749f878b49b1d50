"""Stand-ins for a site's own hooks, named in config as `module:function`."""


def figure_path(fields):
    """A site's resolver: figures grouped by PMCID, the label in the name."""
    return f"site/{fields['pmcid']}/{fields['figure_label']}-{fields['artifact_id']}{fields['ext']}"


def escaping_path(fields):
    return f"../../outside/{fields['artifact_id']}{fields['ext']}"

"""The population view (clinical-logic §11): every IIM patient of a server, worklist, measures."""

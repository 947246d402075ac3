"""HTTP edge of fhir-dm: the Flask app, its blueprints and inbound trust."""

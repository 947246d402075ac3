"""Events: FHIR Subscriptions and the job queue that re-assesses a patient when the record
changes. Generic: other edges register their own tasks; nothing here imports them."""

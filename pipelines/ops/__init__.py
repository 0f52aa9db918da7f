"""Operating a KFP deployment: uploading, running and scheduling the compiled pipeline; cron expressions."""

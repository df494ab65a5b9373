"""Delivery: a finished manuscript as the files its readers open (standalone HTML, DOCX, PDF),
each rendered once per manuscript revision from the stored markdown and kept in S3 beside it.

The renderers (to_html, to_docx, to_pdf) are pure: markdown in, bytes out. Their libraries
(markdown-it-py, python-docx, fpdf2) are imported only when an export is asked for, so no other
route pays for them on a cold start.

Signed webhooks live here too: endpoints registered (endpoints.py), their signatures (signing.py),
where they may go (targets.py) and one attempt at sending (webhook_post.py); the consumer side
sends them (run/webhook_sender.py)."""

-- What each provider call cost in US dollars, priced when it was recorded (prices change; what
-- was spent does not). NULL when the model has no price in the table.
ALTER TABLE generation_attempts ADD COLUMN cost_usd double precision;

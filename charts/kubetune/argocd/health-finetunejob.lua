-- Argo CD health check for kubetune.io/FineTuneJob (resource.customizations.health.kubetune.io_FineTuneJob).
-- Rules (docs/gitops.md):
--   * no status yet, or status.observedGeneration < metadata.generation  -> Progressing
--   * phase Failed (or a Failed condition that is True)                 -> Degraded
--   * phase Cancelled (spec.cancel)                                     -> Degraded
--   * phase Suspended (spec.suspend)                                    -> Suspended
--   * phase Succeeded                                                   -> Healthy
--   * phase Pending / Preparing / Queued / Running (and anything else)  -> Progressing
-- The message is the operator's status.message, or the Ready condition's message.

local function find_condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == ctype then
      return condition
    end
  end
  return nil
end

local function describe(status, fallback)
  if status.message ~= nil and status.message ~= "" then
    return status.message
  end
  local ready = find_condition(status, "Ready")
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    return ready.message
  end
  return fallback
end

local hs = {}
local status = obj.status

if status == nil or status.phase == nil or status.phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to reconcile the FineTuneJob"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local failed = find_condition(status, "Failed")

if phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  local text = describe(status, "the fine-tuning run failed")
  if failed ~= nil and failed.message ~= nil and failed.message ~= "" then
    text = failed.message
  end
  if failed ~= nil and failed.reason ~= nil and failed.reason ~= "" then
    text = failed.reason .. ": " .. text
  end
  hs.message = text
  return hs
end

if phase == "Cancelled" then
  hs.status = "Degraded"
  hs.message = "Cancelled: " .. describe(status, "spec.cancel is true")
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(status, "spec.suspend is true")
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(status, "training finished")
  return hs
end

hs.status = "Progressing"
local text = phase .. ": " .. describe(status, "in progress")
if phase == "Running" and status.progress ~= nil and status.progress.display ~= nil then
  text = text .. " (" .. status.progress.display .. ")"
end
hs.message = text
return hs

-- Drives the plugin in `nvim --headless -u NONE` against a real codelm-lsp, as a user would:
-- open $CODELM_NVIM_FILE, wait for `ready` and the file's warm-up, type $CODELM_NVIM_TYPED on
-- a new last line key by key, wait for the suggestion, accept it with Tab, save. Writes what
-- happened to $CODELM_NVIM_RESULT as JSON ({ghost, line, accepted, error}) and quits. Used by
-- tests/e2e/test_editor_neovim.py.
local env = vim.env
local timeout_ms = tonumber(env.CODELM_NVIM_TIMEOUT_MS or '300000')
local plugin = vim.fs.dirname(vim.fs.dirname(debug.getinfo(1, 'S').source:sub(2)))

vim.opt.runtimepath:prepend(plugin)
vim.cmd('filetype on')
vim.o.swapfile = false
require('codelm').setup({
  cmd = { env.CODELM_NVIM_LSP, '--stdio' },
  settings = { maxTokens = 16, timeoutMs = 240000 },
})

local result = { nvim = tostring(vim.version()), native = vim.lsp.inline_completion ~= nil }

local function finish(err)
  result.error = err
  vim.fn.writefile({ vim.json.encode(result) }, env.CODELM_NVIM_RESULT)
  vim.cmd('qa!')
end

--- Calls `check` every 100 ms until it returns true, then `next`; fails after timeout_ms.
local function poll(what, check, next)
  local deadline, timer = vim.uv.now() + timeout_ms, assert(vim.uv.new_timer())
  timer:start(100, 100, vim.schedule_wrap(function()
    local ok, done = pcall(check)
    if not ok or done or vim.uv.now() > deadline then
      timer:stop()
      timer:close()
      if not ok then
        finish(what .. ': ' .. tostring(done))
      elseif done then
        next()
      else
        finish('timed out waiting for ' .. what)
      end
    end
  end))
end

--- The suggestion on screen: the virtual text of codelm's (0.11) or Neovim's (0.12) namespace.
local function ghost_text()
  local text = ''
  for name, ns in pairs(vim.api.nvim_get_namespaces()) do
    if name == 'codelm.ghost' or name == 'nvim.lsp.inline_completion' then
      for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
        for _, chunk in ipairs(mark[4].virt_text or {}) do
          text = text .. chunk[1]
        end
      end
    end
  end
  return text
end

local function type_keys(keys, next)
  local i = 0
  local timer = assert(vim.uv.new_timer())
  timer:start(0, 60, vim.schedule_wrap(function()
    i = i + 1
    if i > #keys then
      timer:stop()
      timer:close()
      return next()
    end
    vim.api.nvim_input(keys:sub(i, i) == '<' and '<lt>' or keys:sub(i, i))
  end))
end

--- Whether lsp.log says the daemon prefilled the file where the cursor rests (codelm/didFocus).
local function warmed_up()
  local log = io.open(env.CODELM_HOME .. '/log/lsp.log')
  if not log then
    return false
  end
  local text = log:read('*a')
  log:close()
  return text:find('warm-up uri#', 1, true) ~= nil
end

vim.cmd.edit(env.CODELM_NVIM_FILE)
poll('codelm-lsp to be ready and the file warmed up', function()
  return require('codelm').status() == 'ready' and warmed_up()
end, function()
  vim.api.nvim_input('Go')
  type_keys(env.CODELM_NVIM_TYPED, function()
    poll('a suggestion', function()
      return ghost_text() ~= ''
    end, function()
      result.ghost = ghost_text()
      vim.api.nvim_input('<Tab>')
      poll('the suggestion to be inserted', function()
        return vim.api.nvim_get_current_line() ~= env.CODELM_NVIM_TYPED
      end, function()
        result.line = vim.api.nvim_get_current_line()
        vim.api.nvim_input('<Esc>')
        vim.cmd.write()
        -- Sent after the item's codelm.accept, so its counters include the accept.
        local client = vim.lsp.get_clients({ name = 'codelm' })[1]
        local params = { command = 'codelm.stats', arguments = {} }
        client:request('workspace/executeCommand', params, function(err, stats)
          result.accepted = stats and stats.accepted
          finish(err and err.message)
        end)
      end)
    end)
  end)
end)

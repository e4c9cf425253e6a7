-- codelm for Neovim: starts codelm-lsp and shows its inline suggestions. Editors stay thin:
-- every completion decision is the server's. Neovim 0.12+ renders them with the built-in
-- vim.lsp.inline_completion; 0.11 with codelm.ghost.
local M = {}

local defaults = {
  cmd = nil, -- default: the nearest .venv/bin/codelm-lsp above the working directory, else PATH
  filetypes = nil, -- nil: every file type
  settings = {}, -- codelm-lsp options (initializationOptions, camelCase; docs/lsp.md)
  keys = { accept = '<Tab>', trigger = '<M-\\>' },
  debounce_ms = 30, -- 0.11 only: wait before asking (the server adds its own adaptive debounce)
}

local OPTIONS = { 'cmd', 'filetypes', 'settings', 'keys', 'debounce_ms' } -- (two default to nil)
--- What to do where codelm-lsp cannot run (setup() and :checkhealth say it).
M.cmd_hint = "give setup() cmd = { '/path/to/codelm/.venv/bin/codelm-lsp', '--stdio' }"

M.config = vim.deepcopy(defaults)
local commands -- :Codelm's subcommands (below setup, which defines the command)
M.state = { state = 'inactive', message = 'codelm-lsp has not started' }

--- The codelm-lsp command: a project's virtual environment first, as the VS Code extension does.
local function server_cmd()
  local name = vim.fn.has('win32') == 1 and '.venv/Scripts/codelm-lsp.exe' or '.venv/bin/codelm-lsp'
  for dir in vim.fs.parents(vim.fn.getcwd() .. '/.') do
    local candidate = dir .. '/' .. name
    if vim.fn.executable(candidate) == 1 then
      return { candidate, '--stdio' }
    end
  end
  return { 'codelm-lsp', '--stdio' }
end

--- The settings as initializationOptions. Neovim encodes an empty Lua table as a JSON array,
--- which the server cannot take for its options object: an empty one goes as `{}`.
local function init_options(settings)
  if type(settings) == 'table' and next(settings) == nil then
    return vim.empty_dict()
  end
  return settings
end

local function set_state(state, message)
  M.state = { state = state, message = message or '' }
  vim.api.nvim_exec_autocmds('User', { pattern = 'CodelmStatus', modeline = false })
end

local function on_status(_, result)
  set_state(result.state, result.message)
end

local function on_exit(code, signal)
  if code ~= 0 or signal ~= 0 then
    local message = ('codelm-lsp exited (code %d, signal %d); :edit restarts it'):format(code, signal)
    vim.schedule(function()
      set_state('error', message)
      vim.notify('codelm: ' .. message, vim.log.levels.WARN)
    end)
  end
end

--- The workspace root of a buffer with a file; none for a buffer without a name, which
--- Neovim would send as `file://` (two of them would be one document to the server).
local function root_dir(bufnr, on_dir)
  local name = vim.api.nvim_buf_get_name(bufnr)
  if name ~= '' then
    on_dir(vim.fs.root(bufnr, { '.git' }) or vim.fs.dirname(name))
  end
end

local function validate(opts)
  vim.validate('opts', opts, 'table', true)
  opts = opts or {}
  vim.validate('cmd', opts.cmd, 'table', true)
  vim.validate('filetypes', opts.filetypes, 'table', true)
  vim.validate('settings', opts.settings, 'table', true)
  vim.validate('keys', opts.keys, 'table', true)
  vim.validate('debounce_ms', opts.debounce_ms, 'number', true)
  for _, key in ipairs({ 'accept', 'trigger' }) do
    local value = (opts.keys or {})[key]
    vim.validate('keys.' .. key, value, function(v)
      return v == nil or v == false or type(v) == 'string'
    end, true, 'a key (string) or false')
  end
  for name in pairs(opts) do
    if not vim.tbl_contains(OPTIONS, name) then
      error(('unknown option %s (options: %s)'):format(name, table.concat(OPTIONS, ', ')))
    end
  end
end

local FOCUS_DEBOUNCE_MS = 100 -- held-down motions send one, where the cursor stops

--- Tells codelm-lsp where the cursor rests in `bufnr` (codelm/didFocus, docs/lsp.md): it has
--- the daemon read the file there before the first key, so the first suggestion comes at once.
local function watch_focus(client, bufnr)
  local timer = assert(vim.uv.new_timer())
  local function send()
    if not client:is_stopped() and vim.api.nvim_get_current_buf() == bufnr then
      client:notify('codelm/didFocus', vim.lsp.util.make_position_params(0, client.offset_encoding))
    end
  end
  local function later()
    timer:start(FOCUS_DEBOUNCE_MS, 0, vim.schedule_wrap(send))
  end
  local group = vim.api.nvim_create_augroup('codelm.focus.' .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd({ 'BufEnter', 'CursorMoved' }, { group = group, buffer = bufnr, callback = later })
  vim.api.nvim_create_autocmd({ 'LspDetach', 'BufWipeout' }, {
    group = group,
    buffer = bufnr,
    callback = function(args)
      if args.event == 'LspDetach' and args.data.client_id ~= client.id then
        return
      end
      timer:stop()
      if not timer:is_closing() then
        timer:close()
      end
      vim.api.nvim_del_augroup_by_id(group)
    end,
  })
  later()
end

local function on_attach(client, bufnr)
  watch_focus(client, bufnr)
  local keys = M.config.keys
  if vim.lsp.inline_completion then
    -- 0.12 asks as the user types; its get() accepts, so the trigger key is not mapped there.
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
    if keys.accept then
      require('codelm.keys').map_accept(bufnr, keys.accept, function()
        return vim.lsp.inline_completion.get() and '' or nil
      end)
    end
  else
    require('codelm.ghost').attach(client, bufnr, M.config)
  end
end

--- Starts codelm-lsp for matching buffers. `opts` overrides the defaults above.
function M.setup(opts)
  local ok, err = pcall(validate, opts)
  if not ok then
    local message = tostring(err):gsub('^[^:]+:%d+: ', '')
    vim.notify('codelm: setup: ' .. message, vim.log.levels.ERROR)
    return
  end
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(defaults), opts or {})
  local cmd = M.config.cmd or server_cmd()
  if vim.fn.executable(cmd[1]) ~= 1 then
    local message = ('cannot run %s: install codelm (make install) and %s'):format(cmd[1], M.cmd_hint)
    set_state('error', message)
    vim.notify('codelm: ' .. message, vim.log.levels.ERROR)
    return
  end
  -- Assigned, not merged: a second setup() replaces what the first set (filetypes = nil).
  vim.lsp.config['codelm'] = {
    cmd = cmd,
    filetypes = M.config.filetypes,
    root_dir = root_dir,
    init_options = init_options(M.config.settings),
    handlers = { ['codelm/status'] = on_status },
    on_attach = on_attach,
    on_exit = on_exit,
  }
  vim.lsp.enable('codelm')
  vim.api.nvim_create_user_command('Codelm', function(args)
    M.command(args.fargs[1] or 'status')
  end, {
    nargs = '?',
    desc = 'codelm: status, enable, disable, toggle or restart',
    complete = function()
      return vim.tbl_keys(commands)
    end,
  })
end

--- Turns suggestions on or off: in the running servers (`enabled`, docs/lsp.md) and in the
--- options a restarted one starts with.
local function set_enabled(on)
  M.config.settings = vim.tbl_extend('force', M.config.settings or {}, { enabled = on })
  vim.lsp.config('codelm', { init_options = init_options(M.config.settings) })
  for _, client in ipairs(vim.lsp.get_clients({ name = 'codelm' })) do
    client:notify('workspace/didChangeConfiguration', { settings = { codelm = { enabled = on } } })
  end
end

--- Stops codelm-lsp and starts it again for the buffers it served (and any others it matches).
local function restart()
  local clients = vim.lsp.get_clients({ name = 'codelm' })
  vim.lsp.enable('codelm', false)
  local deadline = vim.uv.now() + 3000
  local function start_when_stopped()
    for _, client in ipairs(clients) do
      if not client:is_stopped() then
        if vim.uv.now() < deadline then
          return vim.defer_fn(start_when_stopped, 50)
        end
        client:stop(true)
      end
    end
    set_state('inactive', 'codelm-lsp is restarting')
    vim.lsp.enable('codelm')
  end
  start_when_stopped()
end

commands = {
  status = function()
    vim.notify(('codelm: %s %s'):format(M.state.state, M.state.message))
  end,
  enable = function()
    set_enabled(true)
  end,
  disable = function()
    set_enabled(false)
  end,
  toggle = function()
    set_enabled(M.config.settings.enabled == false)
  end,
  restart = restart,
}

--- `:Codelm {status|enable|disable|toggle|restart}`.
function M.command(name)
  if not commands[name] then
    local names = vim.tbl_keys(commands)
    table.sort(names)
    return vim.notify(('codelm: no command %s (%s)'):format(name, table.concat(names, ', ')), vim.log.levels.ERROR)
  end
  commands[name]()
end

--- The last `codelm/status` {state, message}: loading | ready | busy | error | disabled, or
--- inactive before codelm-lsp has started.
function M.status()
  return M.state.state, M.state.message
end

return M

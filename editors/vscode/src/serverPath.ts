// Where codelm-lsp is: the `codelm.serverPath` setting, else a project venv, else PATH.
import * as path from 'node:path';

export interface PathContext {
  setting: string; // codelm.serverPath; may be relative to the first workspace folder, or start with ~
  workspaceFolders: string[];
  extensionPath: string;
  envPath: string; // $PATH
  home: string;
  platform: NodeJS.Platform;
  isFile: (file: string) => boolean;
}

/** The executable to spawn, or undefined when none was found. */
export function resolveServerPath(ctx: PathContext): string | undefined {
  const setting = ctx.setting.trim();
  if (setting && hasDirectory(setting)) {
    return settingPath(setting, ctx); // explicit: used as given, even if missing (clear error)
  }
  const name = setting || executableName(ctx.platform);
  return searchedPaths(name, ctx).find((file) => ctx.isFile(file));
}

/** Venvs in the workspace folders, the extension folder and their parents, then PATH. */
export function searchedPaths(name: string, ctx: PathContext): string[] {
  const lib = pathLib(ctx.platform);
  const venvBin = ctx.platform === 'win32' ? lib.join('.venv', 'Scripts') : lib.join('.venv', 'bin');
  const venvs = [...ctx.workspaceFolders, ctx.extensionPath]
    .flatMap((start) => ancestors(start, lib))
    .map((dir) => lib.join(dir, venvBin, name));
  const onPath = ctx.envPath
    .split(lib.delimiter)
    .filter((dir) => dir)
    .map((dir) => lib.join(dir, name));
  return [...new Set([...venvs, ...onPath])];
}

function settingPath(setting: string, ctx: PathContext): string {
  const lib = pathLib(ctx.platform);
  if (setting === '~' || setting.startsWith('~/')) {
    return lib.join(ctx.home, setting.slice(1));
  }
  if (lib.isAbsolute(setting) || ctx.workspaceFolders.length === 0) {
    return setting;
  }
  return lib.join(ctx.workspaceFolders[0], setting);
}

function ancestors(start: string, lib: path.PlatformPath): string[] {
  const dirs: string[] = [];
  for (let dir = lib.resolve(start); !dirs.includes(dir); dir = lib.dirname(dir)) {
    dirs.push(dir);
  }
  return dirs;
}

function executableName(platform: NodeJS.Platform): string {
  return platform === 'win32' ? 'codelm-lsp.exe' : 'codelm-lsp';
}

function hasDirectory(setting: string): boolean {
  return setting.includes('/') || setting.includes('\\') || setting.startsWith('~');
}

function pathLib(platform: NodeJS.Platform): path.PlatformPath {
  return platform === 'win32' ? path.win32 : path.posix;
}

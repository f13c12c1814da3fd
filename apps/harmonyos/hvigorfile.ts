import { appTasks } from '@ohos/hvigor-ohos-plugin';

export default {
  system: appTasks, // built-in tasks of an app project
  plugins: []
};
